fn main() {
    eprintln!("pontoon: CNI plugin (work in progress)");
}
