"""CHEX: prune and regrow channels during training (Hou et al., CVPR 2022)."""
