"""imgclust: unsupervised clustering of image archives with convolutional autoencoders."""

__version__ = "0.1.0"
