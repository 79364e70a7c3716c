"""The competition's offline inference: a kit to upload as a Kaggle dataset (:mod:`cervspine.kaggle.kit`:
wheels, a trained run's checkpoints, ``kaggle_predict.py``), and the scoring of the competition's test folder
study by study in memory (:mod:`cervspine.kaggle.predict`: no cache on Kaggle's small disk)."""
