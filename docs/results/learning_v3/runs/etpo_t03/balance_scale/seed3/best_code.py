# best reward 0.958297 at environment step 1
import numpy as np


def build_model(x_train: np.ndarray, y_train: np.ndarray):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import classification_report
    clf = LogisticRegression()
    clf.fit(x_train, y_train)
    return clf

