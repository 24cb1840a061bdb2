"""(image, caption, music) triplets for training and evaluation: manifest reading and audio features."""
