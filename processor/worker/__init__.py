"""The worker: intake (which manifest next), the lane loop, assembly from settings, warm start."""
