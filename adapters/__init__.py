"""Remote (black-box) model adapters: one seam, one module per kind of remote."""
