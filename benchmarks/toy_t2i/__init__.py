"""Scripts around a toy text-to-image world for actsteer's diffusion experiments.

The world itself (dataset, detectors, tokenizer, loading a trained pipeline, labelled grids)
lives in tests/toy_t2i_world, shared with the tests, which do not import `benchmarks`. Here:
`train` trains a small Stable-Diffusion-shaped pipeline on CPU, `sample` renders sample grids,
`evaluate` measures how well the trained model follows its captions, `act_check`,
`steer_eval` and `steer_figure` steer it.
"""
