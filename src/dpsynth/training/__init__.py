"""Training loops for the autoencoder and the latent denoiser, private or not."""
