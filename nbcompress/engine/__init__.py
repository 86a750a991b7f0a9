"""The compression engine: profiling, pruning, history. Never imports IPython or ipywidgets."""
