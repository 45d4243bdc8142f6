"""One module per `lrexp` sub-command: argument parsing and output only; the work lives elsewhere."""
