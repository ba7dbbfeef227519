"""Research and diagnostic scripts: not installed with ``derm-toolchain`` and not part of its API.

They answer questions about the product (where an int8 file's difference comes from, how well the near-duplicate
detector separates copies, what every export target costs on the real model) and write their numbers to
``benchmarks/results/``. Run them from the repository root, with the package installed (``.[train,export]``):

    python -m research.export_bench --run runs/bench/ham_cv/fold_0
    python -m research.int8_noise --file runs/bench/export/model-int8.tflite
    python -m research.near_duplicates --data ../shared/data/ham10000/labels.csv --out benchmarks/results
"""
