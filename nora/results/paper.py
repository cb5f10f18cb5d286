"""The paper's published numbers, as quoted from its abstract (arXiv 2509.13240); the body and its tables are
not available here. Shown beside our results in their own column, never mixed into them."""

SOURCE = "quoted from the abstract (arXiv 2509.13240)"

# NoRA vs full fine-tuning on ViT-Tiny (points of accuracy), "updating only 0.4% of parameters (0.02M)".
TABLE1 = {("cifar10", "nora"): "+0.17", ("cifar100", "nora"): "+0.27"}
TABLE1_NOTE = (
    "the abstract's numbers only: NoRA +0.17 (CIFAR-10) and +0.27 (CIFAR-100) points over full "
    "fine-tuning with 0.4% (0.02M) trainable parameters; it gives no seeds or spread and no numbers "
    "for the other methods"
)

# NoRA++ on LLaMA3-8B: "average MMLU gains of +0.3%-0.8%, including +1.6% on STEM (Alpaca) and +1.3% on OpenOrca".
TABLE2 = {
    ("alpaca", "nora_pp"): "average +0.3 to +0.8; STEM +1.6",
    ("openorca", "nora_pp"): "average +0.3 to +0.8; +1.3 (category not stated)",
}
TABLE2_NOTE = (
    "the abstract's words: \"average MMLU gains of +0.3%–0.8%, including +1.6% on STEM (Alpaca) and "
    '+1.3% on OpenOrca"; it names neither the baseline of these gains (LoRA/DoRA is implied) nor the '
    "category of the +1.3, and gives no seeds or spread"
)

MATCHED_NOTE = (
    'the abstract says NoRA++ "outperforms LoRA and DoRA under matched training budgets by adding '
    'fewer trainable parameters" and gives no numbers for it'
)

SUBSPACE_NOTE = (
    'the abstract says "NoRA constrains adaptation to a low-dimensional functional subspace, '
    'implicitly regularizing update magnitude and direction"'
)
