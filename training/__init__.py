"""Training package: networks, distillation, student + autoencoder training, statistics, evaluation."""
