"""The decisions made across backends: selection strategies, stickiness, rate limits, the
retry rules and budget.
"""
