"""The running configuration: the immutable snapshot a request reads, the one place that
swaps it (reloads, admin changes, the state file), and the file watcher.
"""
