"""The jobs behind the entry points, as library functions that take a composed config: evaluate a
labelled folder, predict a folder or one study, run the whole pipeline. The entry points
(``python -m cervspine.evaluate`` …) and the pipeline call them; tests may too."""
