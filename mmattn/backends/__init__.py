"""One module per backend (reference, cpu, triton, cuda) with the same functions."""
