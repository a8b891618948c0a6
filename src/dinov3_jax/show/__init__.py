"""Pictures of a backbone's patch features: `dinov3-jax show pca|similarity|attention|foreground|match`.

One module per picture (`pca`, `similarity`, `attention`, `foreground`, `match`), the shared panel
helpers (`panels`), the backbone access through the shared extraction loop (`model`) and the
command line (`cli`). Every picture is a PNG made of panels of predictable sizes (see `panels`).
"""
