"""One training recipe per model family, each driven by a JSON config in training/configs/."""
