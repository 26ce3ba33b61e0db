"""Demo models trained in this repository on data that ships inside scikit-learn.

Torch lives here and in export/, never in services/.
"""
