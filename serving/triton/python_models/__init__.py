"""Bodies of the Python-backend models; each model_repository/<model>/1/model.py is a thin import of one."""
