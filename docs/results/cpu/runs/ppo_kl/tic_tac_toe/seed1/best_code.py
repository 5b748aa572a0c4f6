# best reward -1.000000 at environment step 1
import numpy as np


def build_model(x_train: np.ndarray, y_train: np.ndarray):
    from sklearn.ensemble import RandomForestClassifier
    model = build_model(x_train, y_train)
    return model

