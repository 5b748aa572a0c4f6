# best reward -1.000000 at environment step 1
import numpy as np


def build_model(x_train: np.ndarray, y_train: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    model = LogisticRegression(penalty="linear Bend",CoeffColormap="L2")
    model.fit(x_train, y_train)
    return model

