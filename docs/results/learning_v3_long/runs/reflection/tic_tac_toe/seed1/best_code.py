# best reward 0.980548 at environment step 161
import numpy as np


def build_model(x_train: np.ndarray, y_train: np.ndarray):
    from sklearn.ensemble import RandomForestClassifier
    clf = RandomForestClassifier(max_samples=1000, random_state=0)
    clf.fit(x_train, y_train)
    return clf

