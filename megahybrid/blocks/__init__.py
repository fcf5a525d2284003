"""Block-level features wrapped around the pattern's sublayers (issue 13): mHC hyper-connections
(hyper_connections.py) and Mixture-of-Depths token routing (mixture_of_depths.py)."""
