using AnyPrecML.Fuzz;

namespace AnyPrecML.Tests;

/// <summary>
/// The fuzz targets (tests/AnyPrecML.Fuzz) replayed over what is committed beside them: the generated seed corpus, the
/// inputs AFL++ found that reach new coverage (found/), and every crash or hang it reported (crashes/, each fixed in
/// its parser). scripts/fuzz.sh runs the same targets under AFL++; docs/RELIABILITY.md has its figures.
/// </summary>
[TestClass]
public sealed class FuzzReplayTests
{
    private static readonly string FuzzDirectory = FindFuzzDirectory();

    private static string FindFuzzDirectory()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            string candidate = Path.Combine(d.FullName, "tests", "AnyPrecML.Fuzz");
            if (Directory.Exists(Path.Combine(candidate, "corpus"))) return candidate;
        }
        throw new DirectoryNotFoundException("tests/AnyPrecML.Fuzz/corpus not found above the test binaries.");
    }

    private static IEnumerable<string> Inputs(string kind, string target)
    {
        string dir = Path.Combine(FuzzDirectory, kind, target);
        return Directory.Exists(dir) ? Directory.EnumerateFiles(dir).Order(StringComparer.Ordinal) : [];
    }

    [TestMethod]
    public void TheCommittedSeedCorpusIsExactlyWhatTheGeneratorWrites()
    {
        using var dir = TestData.NewTempDir();
        Seeds.WriteCorpus(dir["corpus"]);
        foreach (var target in FuzzTargets.All)
        {
            var generated = Directory.EnumerateFiles(Path.Combine(dir["corpus"], target.Name)).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToArray();
            var committed = Inputs("corpus", target.Name).Select(Path.GetFileName).ToArray();
            CollectionAssert.AreEqual(generated, committed, $"{target.Name}: the committed seeds are the generated ones (regenerate with `anyprec-fuzz seeds`)");
            foreach (var name in generated)
            {
                byte[] fresh = File.ReadAllBytes(Path.Combine(dir["corpus"], target.Name, name!)), kept = File.ReadAllBytes(Path.Combine(FuzzDirectory, "corpus", target.Name, name!));
                // Quantized centroids may differ in a last bit between instruction sets; their layout may not.
                if (target.Name == "ap-safetensors") Assert.HasCount(fresh.Length, kept, $"{target.Name}/{name}");
                else CollectionAssert.AreEqual(fresh, kept, $"{target.Name}/{name}");
            }
        }
    }

    [TestMethod]
    public void EverySeedIsAcceptedByItsParser()
    {
        using var workspace = FuzzWorkspace.Create();
        foreach (var target in FuzzTargets.All)
        {
            var seeds = Inputs("corpus", target.Name).ToList();
            Assert.IsNotEmpty(seeds, $"{target.Name} has no seed");
            foreach (var seed in seeds)
                Assert.IsTrue(FuzzTargets.Run(target, workspace, File.ReadAllBytes(seed)), $"{target.Name}: the valid seed {Path.GetFileName(seed)} was rejected");
        }
    }

    [TestMethod]
    public void EveryInputAflFoundAndEveryCrashReplaysWithoutACrash()
    {
        using var workspace = FuzzWorkspace.Create();
        int replayed = 0, crashes = 0;
        var failures = new List<string>();
        foreach (var target in FuzzTargets.All)
            foreach (var kind in new[] { "found", "crashes" })
                foreach (var file in Inputs(kind, target.Name))
                {
                    replayed++;
                    if (kind == "crashes") crashes++;
                    try { FuzzTargets.Run(target, workspace, File.ReadAllBytes(file)); }
                    catch (FuzzFailure e) { failures.Add($"{kind}/{target.Name}/{Path.GetFileName(file)}: {e.Message}"); }
                }
        Console.WriteLine($"replayed {replayed} inputs, {crashes} of them former crashes");
        Assert.IsEmpty(failures, string.Join("\n", failures));
    }

    [TestMethod]
    public void ACrashOfTheHarnessIsReportedNotSwallowed()
    {
        // The replay above can only fail if the harness reports what escapes a parser: a target that throws something
        // other than its format error, or allocates past the bound, must come back as a FuzzFailure.
        using var workspace = FuzzWorkspace.Create();
        var throwing = new FuzzTarget("throws", "a parser that throws the wrong exception", (_, _) => throw new InvalidOperationException("boom"), typeof(Models.ModelFormatException));
        Assert.ThrowsExactly<FuzzFailure>(() => FuzzTargets.Run(throwing, workspace, [1, 2, 3]));
        var greedy = new FuzzTarget("allocates", "a parser that trusts a size it reads", (_, input) => GC.KeepAlive(new byte[input.Length * 4 + FuzzTargets.FixedAllocationBytes]));
        Assert.ThrowsExactly<FuzzFailure>(() => FuzzTargets.Run(greedy, workspace, new byte[1000]));
        var rejecting = new FuzzTarget("rejects", "a parser that rejects", (_, _) => throw new Models.ModelFormatException("x: bad"), typeof(Models.ModelFormatException));
        Assert.IsFalse(FuzzTargets.Run(rejecting, workspace, [1]));
    }

    [TestMethod]
    public void TheJsonCrashesAflFoundAreOneLineFormatErrorsNamingTheKey()
    {
        using var dir = TestData.NewTempDir();
        string cfg = dir["config.json"];
        // A key given twice: JsonObject threw ArgumentException ("An item with the same key has already been added") on first use.
        File.WriteAllText(cfg, """{"architectures":["LlamaForCausalLM"],"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"head_dim":4,"head_dim":4,"vocab_size":8}""");
        var e = Assert.ThrowsExactly<Models.ModelFormatException>(() => Models.LlamaCheckpoint.ReadHuggingFaceConfig(cfg));
        StringAssert.Contains(e.Message, "head_dim");
        // A bad literal whose text holds a line break: the parser's message quoted it and spanned two lines.
        File.WriteAllText(cfg, "{\"tie_word_embeddings\":tope,\"x\n\":1}");
        e = Assert.ThrowsExactly<Models.ModelFormatException>(() => Models.LlamaCheckpoint.ReadHuggingFaceConfig(cfg));
        Assert.DoesNotContain("\n", e.Message, e.Message);
        StringAssert.StartsWith(e.Message, cfg + ": not valid JSON: ");
    }
}
