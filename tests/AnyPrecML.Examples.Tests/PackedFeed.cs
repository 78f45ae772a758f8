namespace AnyPrecML.Examples.Tests;

/// <summary>
/// The packages as a newcomer makes them: `dotnet pack -c Release -o artifacts` at the repository root (the folder the
/// notebooks and the README restore from), packed once per test run, and a NuGet packages folder of the run's own.
/// </summary>
/// <remarks>
/// Every pack is version 0.1.0, and NuGet never extracts a version again once its global packages folder holds it: a
/// consumer restoring from the shared folder would get whichever 0.1.0 was packed first, by any checkout on the machine.
/// So consumers restore into <see cref="PackagesFolder"/>, which links every other package of the global folder (no
/// re-extraction of ONNX Runtime's 400 MB) and holds no AnyPrecML package until this run's restore extracts it.
/// </remarks>
internal static class PackedFeed
{
    public const string Version = "0.1.0";
    public static readonly string[] Libraries = ["AnyPrecML", "AnyPrecML.MLNet", "AnyPrecML.AI"];
    public const string Tool = "AnyPrecML.Cli";

    private static readonly Lazy<string> Packed = new(Pack, LazyThreadSafetyMode.ExecutionAndPublication);
    private static readonly Lazy<string> Packages = new(IsolatedPackagesFolder, LazyThreadSafetyMode.ExecutionAndPublication);

    /// <summary>The repository's artifacts/ folder, holding this run's packs.</summary>
    public static string Folder => Packed.Value;

    /// <summary>The run's own NuGet packages folder (NUGET_PACKAGES for every consumer).</summary>
    public static string PackagesFolder => Packages.Value;

    public static Dictionary<string, string> ConsumerEnvironment => new() { ["NUGET_PACKAGES"] = PackagesFolder };

    private static string Pack()
    {
        string artifacts = Repo.At("artifacts");
        Directory.CreateDirectory(artifacts);
        foreach (string old in Directory.GetFiles(artifacts, "AnyPrecML*.nupkg").Concat(Directory.GetFiles(artifacts, "AnyPrecML*.snupkg")))
            File.Delete(old);
        // The tool for this machine's platform only: the others differ in their natives alone, and each is a full publish.
        string rid = System.Runtime.InteropServices.RuntimeInformation.RuntimeIdentifier;
        foreach (string project in Libraries.Append(Tool))
        {
            string[] extra = project == Tool ? [$"-p:ToolPackageRuntimeIdentifiers={rid}"] : [];
            var (code, output, err) = Repo.Dotnet(Repo.Root, TimeSpan.FromMinutes(8), null,
                ["pack", Repo.At("src", project), "-c", Repo.Configuration, "-o", artifacts, .. extra]);
            Assert.AreEqual(0, code, $"dotnet pack {project} failed:\n{output}\n{err}");
        }
        return artifacts;
    }

    private static string IsolatedPackagesFolder()
    {
        string global = Environment.GetEnvironmentVariable("NUGET_PACKAGES") is { Length: > 0 } env
            ? env : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
        var mine = Repo.NewTempDir("nuget-packages");
        AppDomain.CurrentDomain.ProcessExit += (_, _) =>
        {
            // The links first, one by one and never recursively: what they point at is the machine's package cache.
            foreach (var link in mine.EnumerateDirectories().Where(d => d.LinkTarget is not null)) link.Delete();
            Repo.Delete(mine);
        };
        if (Directory.Exists(global))
            foreach (string package in Directory.GetDirectories(global))
                if (!Path.GetFileName(package).StartsWith("anyprecml", StringComparison.OrdinalIgnoreCase))
                    Directory.CreateSymbolicLink(Path.Combine(mine.FullName, Path.GetFileName(package)), package);
        return mine.FullName;
    }
}
