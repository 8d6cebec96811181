"""The broker daemon: membership, version book, weight-group epochs, acknowledged rollout buffer."""
