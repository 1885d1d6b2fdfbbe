"""The learning side: Siamese encoders, losses, training, calibration, OOD, Triton export."""
