"""Training the visual synapse (and optionally the music UNet): the paper's Algorithm 1 under Accelerate."""
