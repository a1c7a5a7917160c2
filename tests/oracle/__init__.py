"""PyTorch twins of tinymoe's parts, written from the spec, used only as test oracles."""
