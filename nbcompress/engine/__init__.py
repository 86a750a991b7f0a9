"""The compression engine: subsystems that return data.

Never imports IPython, ipywidgets, matplotlib.pyplot or the notebook layer.
"""
