# best reward 0.905379 at environment step 41
import numpy as np


def build_model(x_train: np.ndarray, y_train: np.ndarray):
    from sklearn.ensemble import RandomForestClassifier
    clf = RandomForestClassifier(max_depth = 10)
    clf.fit(x_train, y_train)
    return clf

