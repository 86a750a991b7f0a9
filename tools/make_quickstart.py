"""Write example_notebooks/01_quickstart.ipynb (kept as code so that edits are reviewable)."""

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# nbcompress quick start\n\n"
        "Train a small CNN on real handwritten digits (scikit-learn's bundled set, upscaled to "
        "28×28), then summarise it, prune half of its weights, fine-tune with masks kept, and undo "
        "— every figure measured in this kernel."
    ),
    nbf.v4.new_code_cell(
        "import torch\n"
        "torch.manual_seed(0)\n"
        "torch.set_num_threads(1)\n"
        "from nbcompress.zoo import SeedCNN, accuracy, load_digits, train\n\n"
        "data = load_digits(28)\n"
        "model = train(SeedCNN(), data.x_train, data.y_train, epochs=4)\n"
        "x = data.x_test[:32]  # an example batch for shapes, MACs and latency\n"
        "dense_acc = accuracy(model, data.x_test, data.y_test)\n"
        "print(f'test accuracy {dense_acc:.2%}')"
    ),
    nbf.v4.new_code_cell("%load_ext nbcompress"),
    nbf.v4.new_markdown_cell(
        "Per-layer table: parameters, nonzeros, MACs (estimated from real shapes), measured "
        "latency and size as dense fp32 / CSR / int8."
    ),
    nbf.v4.new_code_cell("%summary model --input x"),
    nbf.v4.new_markdown_cell(
        "Prune 50% of each layer by L1 magnitude. The classifier is left alone by default. "
        "Masks are kept so that fine-tuning cannot revive pruned weights."
    ),
    nbf.v4.new_code_cell("%prune model 0.5 --input x --keep-masks"),
    nbf.v4.new_code_cell(
        "pruned_acc = accuracy(model, data.x_test, data.y_test)\n"
        "train(model, data.x_train, data.y_train, epochs=1, lr=5e-4, seed=1)\n"
        "tuned_acc = accuracy(model, data.x_test, data.y_test)\n"
        "print(f'dense {dense_acc:.2%} → pruned {pruned_acc:.2%} → fine-tuned {tuned_acc:.2%}')\n"
        "w = model.features[3].weight\n"
        "print(f'features.3 zeros after fine-tuning: {(w == 0).float().mean():.1%}')"
    ),
    nbf.v4.new_code_cell("%prune model --remove-masks\n%undo model --list"),
    nbf.v4.new_markdown_cell("Mistakes get one clear line and leave the model untouched:"),
    nbf.v4.new_code_cell("%prune model 1.5", metadata={"tags": ["raises-exception"]}),
    nbf.v4.new_markdown_cell(
        "Undo every step: the model is bit-exactly the trained dense model again."
    ),
    nbf.v4.new_code_cell(
        "%undo model --all\n"
        "assert accuracy(model, data.x_test, data.y_test) == dense_acc\n"
        "print('restored; accuracy', f'{dense_acc:.2%}')"
    ),
]
nb = nbf.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "example_notebooks/01_quickstart.ipynb")
