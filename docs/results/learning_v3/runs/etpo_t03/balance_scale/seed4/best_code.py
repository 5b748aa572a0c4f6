# best reward 0.825305 at environment step 1
import numpy as np


def build_model(x_train: np.ndarray, y_train: np.ndarray):
    from sklearn.ensemble import RandomForestClassifier
    clf = RandomForestClassifier(max_depth=None, random_state=0)
    clf.fit(x_train, y_train)
    return clf

