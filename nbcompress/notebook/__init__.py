"""The notebook layer: magics, widgets and every figure or HTML drawing (imports the engine)."""
