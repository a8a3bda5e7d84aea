#!/usr/bin/env bash
# The main job on the bundled backbones, on CPU: import -> inspect -> verify the lowering -> compile a
# multi-task supergraph -> inspect it -> search -> baselines -> train -> report -> export.
set -euo pipefail
cd "$(dirname "$0")/.."
MTC=.venv/bin/mtc
OUT=${DEMO_OUT:-demo-out}
mkdir -p "$OUT"
export PYTHONWARNINGS=ignore

echo "== mtc $($MTC --version | awk '{print $3}'): import every bundled backbone into the mtc IR =="
for src in backbones/*.onnx backbones/*.prototxt; do
  name=$(basename "${src%.*}")
  $MTC import "$src" -o "$OUT/$name.onnx"
done
echo
echo "== a PyTorch module through the front end: mtc.zoo:tiny_resnet =="
$MTC import mtc.zoo:tiny_resnet --input-shape 1,3,64,64 -o "$OUT/tiny_resnet_from_torch.onnx"
echo
$MTC inspect "$OUT/tiny_mobilenetv2.onnx" --top 5
$MTC inspect "$OUT/deeplab_resnet34.onnx" --json > "$OUT/deeplab_resnet34.inspect.json"
echo "wrote $OUT/deeplab_resnet34.inspect.json"
echo
echo "== the PyTorch lowering against onnxruntime =="
$MTC verify "$OUT/tiny_resnet.onnx"
$MTC verify "$OUT/mobilenetv2.onnx"
echo
echo "== compile a 3-task supergraph (AutoMTL search space) =="
$MTC compile backbones/tiny_resnet.onnx --tasks seg:seg:13,depth:depth:1,normal:normal:3 \
  --head-width 64 -o "$OUT/tiny_resnet.mtc.onnx"
$MTC inspect "$OUT/tiny_resnet.mtc.onnx" --top 3
echo
echo "== AutoMTL on generated scenes (seg + depth), CPU: search -> baselines -> train -> report =="
DATA="scenes?n_train=512&n_val=128"
$MTC compile backbones/tiny_resnet.onnx --tasks seg:seg:13,depth:depth:1 --head-width 32 -o "$OUT/scenes.mtc.onnx"
rm -rf "$OUT/search" "$OUT/baselines"
$MTC search "$OUT/scenes.mtc.onnx" --data "$DATA" --run-dir "$OUT/search" --pretrain-steps 100 --policy-steps 200
$MTC baseline backbones/tiny_resnet.onnx --tasks seg:seg:13,depth:depth:1 --head-width 32 --data "$DATA" \
  --run-dir "$OUT/baselines" --steps 300
$MTC train "$OUT/search" --steps 300 --baselines "$OUT/baselines"
$MTC report "$OUT/baselines" "$OUT/search" --out "$OUT/report"
echo
echo "== export: one pruned ONNX per task and a fused multi-task ONNX, verified in onnxruntime =="
rm -rf "$OUT/export"
$MTC export "$OUT/search" -o "$OUT/export" --fold-bn
echo
echo "results: $OUT/report.md, policy heat-map $OUT/search/policy.png, logs $OUT/search/metrics.jsonl,"
echo "         deployable models and report in $OUT/export/"
