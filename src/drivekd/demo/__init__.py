"""`drivekd demo`: the paper's experiment in miniature on CPU (synthetic data, a tiny teacher and student).

``config`` holds the presets, ``methods`` the compared methods as training overrides, ``teacher`` the shipped
teacher checkpoint (and how it is made), ``workspace`` the output folder and its reuse rules, ``evaluate`` one
model's predictions and scores, ``runner`` the stages, ``report`` the tables and plots, ``cli`` the command.
See docs/demo.md.
"""
