# best reward -1.000000 at environment step 1

    from sklearn.feature_selection import decide_informatica
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import GaussianGaussianRegressor
    from sklearn.mixture import MixtureModel
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.mixture import ModelSpecSplINTERSECT
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import accuracy_score, classification_report
    from sklearn.metrics
