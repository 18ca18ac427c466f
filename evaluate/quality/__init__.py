"""Quality of a trained checkpoint: bits per byte and loss by position (`perplexity`), synthetic
task scoring and the `archbench eval` driver (`runner`), and the lm-eval harness adapter."""
