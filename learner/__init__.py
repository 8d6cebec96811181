"""The learner: an FSDP2 policy-gradient loop under torchrun with swappable algorithms."""
