"""Weight-search algorithms that run before a format's numerics are applied (AWQ for INT4)."""
