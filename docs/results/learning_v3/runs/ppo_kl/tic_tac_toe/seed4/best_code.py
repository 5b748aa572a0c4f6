# best reward 0.978298 at environment step 25
import numpy as np


def build_model(x_train: np.ndarray, y_train: np.ndarray):
    from sklearn.ensemble import RandomForestClassifier
    clf = RandomForestClassifier(max_depth=None, random_state=4, criterion='entropy')
    clf.fit(x_train, y_train)
    return clf

