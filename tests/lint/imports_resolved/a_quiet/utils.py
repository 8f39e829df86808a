def sync(t):
    print(t)
