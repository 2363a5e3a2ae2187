"""A toy text-to-image world for actsteer's diffusion experiments.

`dataset` draws captioned 32x32 images of coloured shapes (with a "striped style" and a pink
square as the concept to negate), `measure` detects what is drawn from pixel statistics,
`train` trains a small Stable-Diffusion-shaped pipeline on CPU, `sample` renders labelled
grids and `evaluate` measures how well the trained model follows its captions.
"""
