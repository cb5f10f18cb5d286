"""The offline demo: real transfer learning on real data that ships with scikit-learn (:mod:`nora.demo.runner`:
pretrain a small ViT on digits, fine-tune it with every method on three shifted tasks, report), and the written
diagnosis of its numbers (:mod:`nora.demo.diagnosis`). ``python -m nora.demo`` is ``make demo``."""
