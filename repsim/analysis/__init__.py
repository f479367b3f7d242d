"""Layer-by-layer comparison of two models: statistics, convergence curves, heatmaps and reports."""
