"""The small text-to-image model rascompile ships, its procedural data set, classifier and quality metrics.

- ``data``: the seeded procedural data set (shapes on backgrounds, with captions) and its vocabulary;
- ``model``: ``ShapesModel`` (an SD3 MMDiT with a learned caption table), its pipeline and latent space;
- ``train``: the training script (``python -m rascompile.demo.shapes.train``);
- ``classifier``: the CNN that scores prompt adherence and gives features for a Fréchet distance;
- ``generate`` and ``quality``: dense and RAS generation, PSNR/SSIM and the Fréchet distance.
"""
