"""AV-Digits: an audio-visual digit task in the style of AV-MNIST, built from real parts offline."""
