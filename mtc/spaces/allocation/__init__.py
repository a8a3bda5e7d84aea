"""The allocation space (Gumbel-Matrix, Maziarz et al.): see docs/spaces/allocation.md."""
