"""cervspine: cervical spine fracture detection on CT (RSNA 2022) with Lightning + Hydra."""

__version__ = "0.1.0"

VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
TARGETS = (*VERTEBRAE, "patient_overall")
