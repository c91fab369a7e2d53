"""What people look at: panels of the hardest and easiest samples, plots, and the W&B report.

Render only: which samples to show comes from `tracking.scoring.rank`; how to show a
sample comes from a view (`tracking.report.views`). Panels are drawn with PIL, plots with
matplotlib, imported when drawing.
"""
