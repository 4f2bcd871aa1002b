"""The paper's appendix experiments: the DiT backbone (App. J), the CelebA evaluation classifier and extreme-subset
filter (App. D), the classifiers' zoom-crop augmentation (official code), sample quality and memorisation (App. H, I:
FID, precision / recall, nearest images, the FID Inception), DDIM inversion and editing (App. M, N)."""
